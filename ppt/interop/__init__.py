"""Other projects' checkpoints in and out (Pointcept today: ``ppt.interop.pointcept``, its families and ``pointcept_shared``).

Nothing here imports the other project's code: key maps and configs are read from the
reference's source once and written down (see each family module's docstring).
"""


class ConversionError(ValueError):
    """A checkpoint or config the converter does not understand; the message names the key,
    file or setting and why."""
