"""The data: the image folder's layout (folder), decoding (decode), loading and normalisation (load), the
batches every method sees alike (batches), and the digits demo (digits)."""
