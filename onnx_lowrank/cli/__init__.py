"""The command line and what it shows: the terminal summary and the HTML report."""
