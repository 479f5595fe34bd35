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
