"""The cost model of each cost budget: counted (MACs, parameters) or measured (latency)."""

from dg2pf_tf import settings
from dg2pf_tf.channels import costs, groups, latency


def _counted(model, prunable, total, budget):
    return costs.weight_cost_model(model, groups.channel_pairs(prunable.groups), total, budget)


def _measured(model, prunable, total, budget):
    return latency.latency_costs(model, prunable, budget)


_BUILDERS = {settings.MACs: _counted, settings.Params: _counted, settings.Latency: _measured}


def cost_model(model, prunable, total, budget):
    """The `costs.CostModel` of `budget` (a `settings.Budget` that counts a cost) for
    `model`, whose `prunable` channel groups (`groups.Prunable`) hold `total` channels.

    Raises ValueError where the cost cannot be counted or measured (an input of
    unknown size).
    """
    return _BUILDERS[type(budget)](model, prunable, total, budget)
