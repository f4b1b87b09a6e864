"""Pictures of frames with ground-truth and predicted boxes (``streampetr visualize``)."""
