"""The user's network: loading every weight format and bioimage.io package, probing the shapes it takes, its outputs and normalization inventory."""
