# Which figures exist depends on which stages the config enables (no data, no figure).


def figure_targets():
    """Figure files (PNG and PDF) for the stages present in the config."""
    return []
