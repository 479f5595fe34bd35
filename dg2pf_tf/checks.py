"""Argument checks shared by the public functions, each with the message users see."""


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
