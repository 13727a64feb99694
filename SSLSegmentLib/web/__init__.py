"""The review in a web browser: a trame-slicer page on the web server, driving the same review session, scene logic
and presenter as the Slicer module (`SSLSegmentLib.review`).

`access` (who may open the page; standard library), `review` (the page's workflow, no trame: tested directly) and
`app` (the trame layout and bindings; needs `trame-slicer[standalone]`). Started by `sslsegment review-web`.
"""
