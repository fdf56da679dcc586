"""Vision-language models: vision towers and projectors feeding the shared text decoder."""
