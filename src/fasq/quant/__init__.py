"""The algorithm: k-means, PQ and RTN of one matrix, input-channel importance, tensor-parallel fits, the size solver."""
