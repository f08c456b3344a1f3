"""The RS-SSL benchmark: image sources, the split, generation, and the built dataset with its
card, preview and Hub push. Training reads the result through `rsmatch.data`."""
