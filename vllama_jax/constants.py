"""Facts shared by the data and model layers (neither may import the other)."""

IGNORE_INDEX = -100  # label value excluded from the loss (PyTorch's cross-entropy default)
IMAGE_PLACEHOLDER = "<ImageHere>"  # prompt token replaced by the visual soft tokens
AUDIO_PLACEHOLDER = "<AudioHere>"  # prompt token replaced by the audio soft tokens
