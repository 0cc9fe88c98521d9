"""Exceptions raised by the kernel entry points (re-exported by dplis)."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite: clipping would hide it, so the step is refused."""
