"""gradwatch's training core: pure PyTorch and NumPy, no web imports."""
