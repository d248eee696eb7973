"""``safesteer report``: one self-contained HTML page of a run, evaluation or comparison directory.

:mod:`.sources` finds what a directory is, :mod:`.run_view`, :mod:`.eval_view` and
:mod:`.compare_view` turn its artifacts into sections, :mod:`.svg` draws the plots and
:mod:`.page` the HTML; :mod:`.build` puts the page together and :mod:`.command` is the CLI.
"""
