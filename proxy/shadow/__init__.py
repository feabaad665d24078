"""Shadow traffic: the mirror that sends sampled copies to a shadow upstream in the
background (``mirror``), the comparison of a copy's answer with the primary's
(``compare``) and the capped record of mismatches (``record``).
"""
