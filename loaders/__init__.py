"""loaders: read a built corpus (local folder, HTTP, or the Hub) as a torch stream.

Importing this package does not import torch; the torch dataset lives in its own module.
"""
