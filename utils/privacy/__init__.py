"""The privacy plan of a run and what it spends: arguments and sigma, accounting, sampling, the
privacy ledger over every run on a data set, and the private validation loss."""
