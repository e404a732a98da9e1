"""The CPU kernels: a C++ library compiled on first use (`library`), the linear op (`linear`, `int8`) and k-means (`kmeans`)."""
