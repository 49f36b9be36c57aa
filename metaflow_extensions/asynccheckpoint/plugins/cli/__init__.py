"""The `checkpoint` command group (`python flow.py checkpoint ...`).

Imports the card and the shared layer; nothing imports it but the registration (by name).
"""
