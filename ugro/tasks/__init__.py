"""The Invoke task collections; root `tasks.py` composes them.

Tasks are thin: parse options, call a function in `ugro`, print, pick the exit
code. `cli` turns a user-caused `UgroError` into one line and a non-zero exit.
"""
