import re, sys, collections
sass = open(sys.argv[1]).read().splitlines()
labels = {}
ins = []
for line in sass:
    m = re.match(r"^\.(L_x_\d+):", line.strip())
    if m: labels[m.group(1)] = len(ins); continue
    m = re.match(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
    if m: ins.append(m.group(2))
# backward branches
for i, t in enumerate(ins):
    m = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", t)
    if m and labels.get(m.group(1), 1e9) < i:
        body = ins[labels[m.group(1)]:i+1]
        ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", x).group(1) for x in body)
        print(f"loop {m.group(1)} len {len(body)}:", ", ".join(f"{o}:{c}" for o, c in ops.most_common(40)))
