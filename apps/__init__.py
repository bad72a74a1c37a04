"""The mesh's own applications: what `meshctl app` runs inside the pods of a demo or a test.

They import nothing of ours (import-linter keeps it so) and only the standard library, so that a pod's workload
runs with any Python, by path (`python apps/echo.py serve ...`) as well as through `meshctl app`.
"""
