"""search: vectors -> neighbours. Exact top-k over streamed blocks, FAISS indexes, ANN vs exact.

Owns exact search (`exact`: ties broken by id, independent of block size), index planning
(`plan`: a FAISS factory string from rows, dim and a memory budget), building (`build`) and
loading (`index`) FAISS indexes with their ids, and the ANN-vs-exact check (`ann`).
May import: `errors`, `_imports`, `_io`, `data`, `metrics`, `embed`.
"""
