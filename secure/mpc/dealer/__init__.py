"""The dealer (rank 2, CrypTen's trusted third party): ``supervisor.run_dealer`` restarts one process per generation,
``server.py`` is that process (whitelisted requests, never any data), ``client.py`` is party 0's side of a request.
"""
