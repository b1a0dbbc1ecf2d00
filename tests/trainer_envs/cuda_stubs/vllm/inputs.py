class TokensPrompt(dict):
    """Stand-in (see ../README.md)."""
