from .attention import grid, heatmap_on_image, labelled, level_map_to_image, mark_pixel

__all__ = ["grid", "heatmap_on_image", "labelled", "level_map_to_image", "mark_pixel"]
