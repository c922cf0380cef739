"""Flower ClientApp for skin-fl sites and the site-side tools."""
