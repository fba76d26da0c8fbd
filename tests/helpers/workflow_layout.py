"""Workflow layout checks shared by the workflow tests and the browser tests."""


def overlapping(boxes: dict) -> list[tuple]:
    items = sorted(boxes.items(), key=lambda kv: kv[1][0])
    found = []
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(items):
        for b, (bx0, by0, bx1, by1) in items[i + 1:]:
            if bx0 >= ax1:
                break
            if ay0 < by1 and by0 < ay1:
                found.append((a, b))
    return found
