"""The argument checks that several public functions share, each with the message users see.

A check that only one function makes stays beside that function; structures and
budgets are parsed in `settings`. Keras-free but for `check_model` and
`fitting_teacher`, which look at models.
"""

import keras

SCOPES = ("global", "layer")


def positive_int(name, value, *, none_ok=False):
    """Returns `value` if it is an int >= 1 (or None when `none_ok`).

    Raises ValueError naming the argument `name` and the value given.
    """
    if none_ok and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an int >= 1" if none_ok else "an int >= 1"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def positive_number(name, value, *, zero_ok=False):
    """Returns `value` as a float if it is a number > 0 (>= 0 when `zero_ok`).

    Raises ValueError naming the argument `name` and the value given.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= 0 if zero_ok else number > 0):
        raise ValueError(f"`{name}` must be a number {'>= 0' if zero_ok else '> 0'}, got {value!r}.")
    return number


def check_schedule(schedule, classes):
    """Returns `schedule` if it is None or an instance of `classes` (dg2pf_tf schedules).

    Raises TypeError otherwise.
    """
    if schedule is not None and not isinstance(schedule, classes):
        raise TypeError(
            f"`schedule` must be a dg2pf_tf.schedules object (Linear, Polynomial, Constant), got {schedule!r}.")
    return schedule


def fitting_teacher(model, teacher):
    """Checks that `teacher` takes `model`'s inputs and gives outputs of its
    shapes (when both are built graphs; a subclassed model is checked as it runs).

    Raises ValueError with both shapes otherwise.
    """
    def shapes(m, side):
        tensors = getattr(m, side, None)
        return None if tensors is None else [tuple(t.shape[1:]) for t in tensors]

    for side in ("inputs", "outputs"):
        mine, theirs = shapes(model, side), shapes(teacher, side)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(
                f"`teacher` '{teacher.name}' has {side} shaped {theirs}, the model "
                f"'{model.name}' {mine}: distillation feeds both the same inputs and compares "
                "their outputs. Give a teacher of the same task (the dense model this one was "
                "pruned from).")


def check_sparsity(sparsity, name="sparsity"):
    """Returns `sparsity` as a float; raises ValueError unless it is in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a number in [0, 1), got {sparsity!r}."
        ) from None
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1): it is the fraction of prunable "
            f"weights set to zero (0.9 keeps 10%). Got {sparsity!r}."
        )
    return value


def check_scope(scope):
    """Raises ValueError unless `scope` is 'global' or 'layer'."""
    if scope not in SCOPES:
        raise ValueError(
            f"`scope` must be one of {SCOPES} ('global': one magnitude "
            f"threshold over every prunable weight; 'layer': the same "
            f"sparsity in each kernel). Got {scope!r}."
        )
    return scope


def check_floor(floor):
    """Returns `floor` as a float; raises ValueError unless it is in [0, 1]."""
    try:
        value = float(floor)
    except (TypeError, ValueError):
        raise TypeError(f"`floor` must be a number in [0, 1], got {floor!r}.") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`floor` must be in [0, 1]: the share of its Erdos-Renyi-kernel "
            f"allocation each kernel keeps whatever its magnitudes (0: pure "
            f"global magnitude). Got {floor!r}."
        )
    return value


def check_model(model, what):
    if not isinstance(model, keras.Model):
        raise TypeError(f"{what} takes a Keras model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"{what}: model '{model.name}' is not built. Build it first (give it an "
            f"Input, call it on a batch, or call `model.build(input_shape)`).")


def check_begin(begin_epoch):
    if isinstance(begin_epoch, bool) or not isinstance(begin_epoch, int) or begin_epoch < 0:
        raise ValueError(
            f"`begin_epoch` must be a whole number >= 0, got {begin_epoch!r}."
        )
    return begin_epoch


def check_temperature(temperature):
    """Returns the distillation `temperature` as a float; raises ValueError unless it is > 0."""
    if not float(temperature) > 0:
        raise ValueError(f"`temperature` must be > 0 (it softens both distributions), got {temperature!r}.")
    return float(temperature)


def check_alpha(alpha):
    """Returns the KD weight `alpha` as a float; raises ValueError unless it is in [0, 1]."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1] (the weight of the distillation term), got {alpha!r}.")
    return float(alpha)
