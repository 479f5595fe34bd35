"""What a mask removes (the structure) and what a sparsity level counts (the budget), as typed values.

The public API takes them as strings too ('unstructured', 'channel', '2:4';
'channels', 'macs', 'params'); `structure()` and `budget()` parse a string once
into these values, and the code below chooses its behaviour by their types and
attributes, never by comparing names. `str()` of each gives the string back,
which is how `.keras` files and checkpoints record them.
"""

import dataclasses
import typing

from dg2pf_tf import checks

DEFAULT_SPARSITY = 0.9
_LARGEST_M = 64


class Structure:
    """Base class of what a mask removes.

    Attributes:
        name: the string the public API accepts for it.
        default_floor: the `floor` used when none is given.
        shrinks: a model pruned this way is rebuilt smaller (`dg2pf_tf.shrink`).
        pattern: the N:M pattern every pruned kernel holds at the end, or None.
    """

    name: typing.ClassVar[str]
    default_floor: typing.ClassVar[float] = 0.0
    shrinks: typing.ClassVar[bool] = False
    pattern = None

    def __str__(self):
        return self.name

    def sparsity(self, sparsity=None):
        """The target sparsity: `sparsity`, DEFAULT_SPARSITY when None. Raises ValueError for a bad one."""
        return checks.check_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)

    def floor(self, floor=None):
        """`floor`, or `default_floor` when None, checked. Raises ValueError for a bad one."""
        return checks.check_floor(self.default_floor if floor is None else floor)


@dataclasses.dataclass(frozen=True)
class Unstructured(Structure):
    """Single weights: the smallest magnitudes go, wherever they are. `floor` defaults
    to 1.0: each kernel keeps at least its Erdos-Renyi-kernel share."""

    name: typing.ClassVar[str] = "unstructured"
    default_floor: typing.ClassVar[float] = 1.0


@dataclasses.dataclass(frozen=True)
class Channels(Structure):
    """Whole channels of coupled groups (`dg2pf_tf.channel_groups`): the pruned model
    shrinks. `floor` defaults to 0.5: each group keeps at least half its uniform share."""

    name: typing.ClassVar[str] = "channel"
    default_floor: typing.ClassVar[float] = 0.5
    shrinks: typing.ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class NM(Structure):
    """At most `n` nonzeros in every `m` consecutive inputs of a kernel ('2:4', the
    pattern of sparse tensor cores). Its only target is 1 - n/m; it has no floor.

    Raises ValueError unless 1 <= n < m <= 64.
    """

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m <= _LARGEST_M):
            raise ValueError(
                f"`structure` {self.n}:{self.m}: an N:M pattern keeps N of every M weights, so it "
                f"needs 1 <= N < M <= {_LARGEST_M}, whole numbers (e.g. '2:4').")

    @property
    def name(self):
        return f"{self.n}:{self.m}"

    @property
    def pattern(self):
        return self

    @property
    def target(self):
        """The sparsity the pattern reaches: 1 - n/m."""
        return 1.0 - self.n / self.m

    def sparsity(self, sparsity=None):
        """1 - n/m. Raises ValueError for any other `sparsity` given."""
        if sparsity is not None and abs(checks.check_sparsity(sparsity) - self.target) > 1e-9:
            raise ValueError(
                f"With structure '{self}' the final sparsity is 1 - {self.n}/{self.m} = {self.target:g}: "
                f"leave `sparsity` unset or give {self.target:g}; got {sparsity!r}.")
        return self.target

    def floor(self, floor=None):
        """0.0. Raises ValueError for any other `floor` given."""
        if floor not in (None, 0, 0.0):
            raise ValueError(
                f"`floor` has no meaning with structure '{self}': every block keeps the same "
                f"share, so no layer can be emptied. Leave `floor` unset; got {floor!r}.")
        return 0.0


def _nm(text):
    """`NM` of a string such as '2:4', or None if it is not of that form."""
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        return NM(int(parts[0]), int(parts[1]))
    return None


def structure(value):
    """The `Structure` `value` names: a `Structure` as is, or 'unstructured', 'channel'
    or an N:M pattern such as '2:4'. Raises ValueError for anything else."""
    if isinstance(value, Structure):
        return value
    if isinstance(value, str):
        found = {"unstructured": Unstructured(), "channel": Channels()}.get(value) or _nm(value)
        if found is not None:
            return found
    raise ValueError(
        f"`structure` must be 'unstructured', 'channel' or an N:M pattern such as '2:4' (or "
        f"dg2pf_tf.Unstructured(), Channels(), NM(n, m)), got {value!r}.")


class Budget:
    """Base class of what a sparsity level is a share of.

    Attributes:
        name: the string the public API accepts for it.
        unit: what is counted, in words.
        counts_cost: levels are a share of a cost that channels carry (the
            channels are then ranked by score per unit of cost).
    """

    name: typing.ClassVar[str]
    unit: typing.ClassVar[str]
    counts_cost: typing.ClassVar[bool] = True
    round_to = 1  # channels go one at a time: see `Latency.round_to`

    def __str__(self):
        return self.name

    def config(self):
        """What `.keras` files and checkpoints record: the name."""
        return self.name

    def amount(self, cost):
        """`cost` (an integer count of `unit`) in words."""
        return f"{cost:,} {self.unit}"


@dataclasses.dataclass(frozen=True)
class ChannelCount(Budget):
    """The default: with structure 'channel' the level is the share of channels
    removed; single weights and N:M patterns count weights whatever the budget."""

    name: typing.ClassVar[str] = "channels"
    unit: typing.ClassVar[str] = "channels"
    counts_cost: typing.ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class MACs(Budget):
    """The share of the model's multiply-accumulates at its input size (a faster model)."""

    name: typing.ClassVar[str] = "macs"
    unit: typing.ClassVar[str] = "MACs"


@dataclasses.dataclass(frozen=True)
class Params(Budget):
    """The share of the model's parameters (a smaller model)."""

    name: typing.ClassVar[str] = "params"
    unit: typing.ClassVar[str] = "parameters"


RUNTIMES = ("keras", "litert")


@dataclasses.dataclass(frozen=True)
class Latency(Budget):
    """The share of the model's latency, measured on this machine in the runtime it
    ships to (`dg2pf_tf.channels.latency` times each layer at a few widths).

    Attributes:
        runtime: 'keras' (the compiled `predict_on_batch`) or 'litert' (the
            LiteRT interpreter with its default XNNPACK delegate, float32).
        batch_size: examples per call; default 32 in Keras, 1 in LiteRT.
        threads: LiteRT's `num_threads` (default: the runtime's own choice);
            Keras uses TensorFlow's thread pools, so it takes none.
        cache_dir: where the measured tables are kept (default
            `$XDG_CACHE_HOME/dg2pf_tf/latency`, or `~/.cache/...`); not recorded.
        round_to: each channel group keeps a multiple of this many channels (or
            all of them). Default 8: runtimes compute channels in tiles (XNNPACK
            in 8s and 16s), and a width just past a tile costs most of a tile
            more. 1 lets any width stay.

    Raises ValueError for an unknown runtime, a batch size, thread count or
    `round_to` that is not a positive whole number, or `threads` with runtime 'keras'.
    """

    name: typing.ClassVar[str] = "latency"
    unit: typing.ClassVar[str] = "latency"
    runtime: str = "keras"
    batch_size: int | None = None
    threads: int | None = None
    cache_dir: str | None = dataclasses.field(default=None, compare=False)
    round_to: int = 8

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"Latency(runtime=...) must be one of {RUNTIMES}, got {self.runtime!r}.")
        checks.positive_int("Latency batch_size", self.batch_size, none_ok=True)
        checks.positive_int("Latency threads", self.threads, none_ok=True)
        checks.positive_int("Latency round_to", self.round_to)
        if self.threads is not None and self.runtime == "keras":
            raise ValueError(
                "Latency(threads=...) sets the LiteRT interpreter's threads; with runtime='keras' "
                "TensorFlow's own thread pools run the model (set them with "
                "tf.config.threading). Drop `threads`, or use runtime='litert'.")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", 32 if self.runtime == "keras" else 1)

    def config(self):
        """`{'name': 'latency', 'runtime', 'batch_size', 'threads', 'round_to'}`."""
        return {"name": self.name, "runtime": self.runtime, "batch_size": self.batch_size,
                "threads": self.threads, "round_to": self.round_to}

    def amount(self, cost):
        """`cost` (picoseconds, as the latency model counts) in milliseconds."""
        return f"{cost / 1e9:,.2f} ms"

    def __str__(self):
        threads = "" if self.threads is None else f", {self.threads} threads"
        tiles = "" if self.round_to == 1 else f", widths in {self.round_to}s"
        return f"latency ({self.runtime}, batch {self.batch_size}{threads}{tiles})"


_BUDGETS = {b.name: b for b in (ChannelCount(), MACs(), Params(), Latency())}


def _from_config(value):
    """A `Budget` from what `Budget.config()` wrote: a name, or a dict with one."""
    if isinstance(value, dict) and value.get("name") == Latency.name:
        # Written before `round_to` existed: channels went one at a time then.
        return Latency(**{"round_to": 1, **{k: v for k, v in value.items() if k != "name"}})
    return _BUDGETS.get(value) if isinstance(value, str) else None


def budget(value, structure_=None):
    """The `Budget` `value` names: a `Budget` as is, 'channels', 'macs', 'params' or
    'latency' (`Latency()`), or what `Budget.config()` wrote.

    Raises ValueError for anything else, or a budget that counts a cost with a
    `structure_` that does not shrink (single weights and N:M patterns save no
    compute on a CPU).
    """
    found = value if isinstance(value, Budget) else _from_config(value)
    if found is None:
        raise ValueError(
            f"`budget` must be one of {tuple(_BUDGETS)} (what `sparsity` is a share of: channels, "
            f"multiply-accumulates, parameters or measured latency), or a dg2pf_tf budget such as "
            f"dg2pf_tf.MACs() or dg2pf_tf.Latency(runtime='litert', threads=2); got {value!r}.")
    if found.counts_cost and structure_ is not None and not structure_.shrinks:
        raise ValueError(
            f"`budget={str(found)!r}` allocates whole channels by what they cost, so it needs "
            f"structure='channel' (got structure={str(structure_)!r}). Single weights and N:M "
            f"patterns save no compute on a CPU; their `sparsity` counts weights.")
    return found
