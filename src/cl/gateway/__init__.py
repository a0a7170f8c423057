"""`cl-gateway`: the one process that holds the accounts' tokens, between every CLI and the API.

`limits` reads what the API says of an account's usage; `refresher` keeps each OAuth account's
token fresh (one refresh at a time per account); `proxy` forwards a CLI's request with the real
credential of the account its run is on now; `main` is the daemon around them.
"""
