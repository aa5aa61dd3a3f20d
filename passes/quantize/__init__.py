"""Quantization passes: int8 (QDQ), k-means weight sharing and Huffman coding of the indices."""
