"""HomeSpec: lossless pipelined speculative decoding across the devices you own.

Importing this package loads no torch, zmq or textual; see DESIGN.md §3 for the layout.
"""

__version__ = "0.1.0"
