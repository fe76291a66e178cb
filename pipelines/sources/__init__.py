"""Dataset sources: fetchers that build the embedded default corpus from package registries."""
