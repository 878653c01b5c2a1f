"""PPT: Point Prompt Training for multi-dataset 3D semantic segmentation on a SparseUNet."""
