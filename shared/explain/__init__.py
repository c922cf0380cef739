"""Explanations of classifier decisions: Grad-CAM and Grad-CAM++ heatmaps and their overlays."""
