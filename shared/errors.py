"""Project errors whose messages name the fix."""


class SkinFLError(Exception):
    """Base class for skin-fl errors that are meant to be shown to the user as they are."""


class DataError(SkinFLError, ValueError):
    """A dataset folder, file or row cannot be used; the message names it and the fix."""


class ConfigError(SkinFLError, ValueError):
    """Settings are missing, partial or contradictory; the message names the fix."""


class ModelError(SkinFLError, ValueError):
    """A model name, weights file or saved model cannot be used; the message names the fix."""
