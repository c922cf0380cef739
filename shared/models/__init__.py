"""Model builders: the timm lesion classifier and its saved-model format."""
