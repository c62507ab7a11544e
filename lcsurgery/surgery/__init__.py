"""The surgery: converting models, the gated block and the converted model container."""
