"""The torch halves of the model families (one package each, named like its family's package in
:mod:`apet.models`): the host side of export, the torch backend and the benchmarks."""
