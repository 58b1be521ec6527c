"""The data layer: the event contract, input schemas, timestamps, dataset loaders, atomic I/O.

Nothing here knows about tokens or models; everything downstream trusts what it returns.
"""
