class MistralExportError(Exception):
    """A problem with the user's input (file, tensor, option), reported by the CLI as one clear line."""
