"""Argument checks shared by the public functions, each with the message users see."""

import keras


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
    """Checks that `teacher`'s outputs have the shapes of `model`'s (when both
    are built graphs; a subclassed model is only checked as it runs).

    Raises ValueError with both shapes otherwise.
    """
    shapes = [keras.tree.map_structure(lambda t: tuple(t.shape[1:]), getattr(m, "outputs", None))
              for m in (model, teacher)]
    if None not in shapes and shapes[0] != shapes[1]:
        raise ValueError(
            f"`teacher` '{teacher.name}' gives outputs shaped {shapes[1]}, the model "
            f"'{model.name}' {shapes[0]}: distillation compares them. Give a teacher of the "
            "same task (the dense model this one was pruned from).")
