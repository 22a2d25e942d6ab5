"""Dates as the admin shows them: ISO-like and short ("2026-12-07 14:21"), so a list of
tokens or audit events fits a laptop's width (issue 20, item 6). Times are UTC."""

DATETIME_FORMAT = "Y-m-d H:i"
SHORT_DATETIME_FORMAT = "Y-m-d H:i"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
