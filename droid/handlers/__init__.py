"""Thin REST handlers: parse and validate, make one service call, shape the reply."""
