"""The seed's Serverless Pipeline Demo: `serverless demo` (pipeline.py, geocoder.py, web.py).

Nothing is imported here, so that loading the CLI registers no demo function.
"""
