"""Building blocks of the decoder: norms, rotary embeddings, linear layers, paged attention."""
