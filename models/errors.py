"""The one error type for bad user input; the command line prints it without a traceback."""


class ConfigError(ValueError):
    """A setting the user chose is invalid; the message names it and what is allowed."""


def unknown_name(kind: str, name, valid) -> ConfigError:
    names = ", ".join(sorted(valid))
    return ConfigError(f"Unknown {kind} '{name}'. Valid {kind} names are: {names}.")
