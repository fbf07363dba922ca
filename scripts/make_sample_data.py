#!/usr/bin/env python3
"""Write data/sample/{train,validation}.jsonl: a small domain-adaptation set, deterministically.

The domain: customer support for Velora, a fictional maker of electric bikes (four models, their specs,
error codes, warranty, returns, servicing, the VeloraLink app, orders and warranty look-ups). Every fact
comes from the tables below, so the answers are consistent and a model tuned on train can lower its
loss on validation: validation asks about the same facts in other combinations and phrasings.

The mix (train / validation): prompt-completion with plain strings, prompt-completion with message
lists, chat with reasoning (`thinking` or `reasoning`), chat calling a tool (analysis, call, result,
final) and two-turn chat. Examples are short (about 60 to 250 tokens) and alike in structure, which is
what a few minutes of CPU training on a tiny model can learn from.

    python scripts/make_sample_data.py            # rewrites data/sample/
    python scripts/make_sample_data.py --check    # exit 1 if the files differ from what it would write
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20250805
OUT = Path(__file__).resolve().parent.parent / "data" / "sample"
N_TRAIN, N_VALIDATION = 240, 60

SYSTEM = "You are Velora's e-bike support assistant. Answer briefly, from Velora's documentation."

BIKES = {
    "Velora City": dict(
        range_km=60, battery_wh=418, charge_h="4.5", weight_kg=21, motor_w=250, price=1890, use="commuting in town"
    ),
    "Velora Trail": dict(
        range_km=90, battery_wh=625, charge_h="6", weight_kg=24, motor_w=250, price=2690, use="gravel paths and hills"
    ),
    "Velora Fold": dict(
        range_km=40, battery_wh=300, charge_h="3.5", weight_kg=16, motor_w=250, price=1490, use="trains and small flats"
    ),
    "Velora Cargo": dict(
        range_km=75, battery_wh=750, charge_h="7", weight_kg=32, motor_w=250, price=3290, use="children and shopping"
    ),
}

ERRORS = {
    "E01": (
        "the battery is not detected",
        "switch the bike off, take the battery out, check that the contacts are clean and dry, and lock it back in until it clicks",
    ),
    "E02": ("the motor is overheating", "stop riding and let the motor cool down for 15 minutes before you ride on"),
    "E03": (
        "the speed sensor gets no signal",
        "check that the spoke magnet sits within 5 mm of the sensor on the rear frame",
    ),
    "E04": (
        "the display lost contact with the controller",
        "switch the bike off for 30 seconds and back on; if it comes back, book a service check",
    ),
    "E05": ("the battery voltage is too low", "charge the battery fully before the next ride"),
    "E06": (
        "the torque sensor needs calibration",
        "switch the bike on without touching the pedals and wait 10 seconds",
    ),
}

POLICIES = {
    "warranty": "Velora covers the frame for 5 years, the motor for 3 years and the battery for 2 years or 500 full charges, whichever comes first.",
    "returns": "You can return a Velora bike within 30 days of delivery if it has been ridden less than 100 km; the return shipping is free.",
    "service": "Velora recommends a service every 1,000 km or once a year, whichever comes first; the first service within 3 months is free.",
    "battery care": "Store the battery between 10 and 25 °C at about 60 % charge, and charge it at least once every 3 months when the bike is not used.",
    "app pairing": "To pair a bike with the VeloraLink app, switch the bike on, hold the light button for 5 seconds until the display shows BT, then tap Add bike in the app.",
    "shipping": "Velora ships bikes within 3 working days; delivery takes 2 to 5 working days in the EU and the bike arrives 95 % assembled.",
}

POLICY_QUESTIONS = {
    "warranty": [
        "What does the Velora warranty cover?",
        "How long is the warranty on a Velora bike?",
        "Is the battery covered by the warranty, and for how long?",
    ],
    "returns": [
        "Can I return my Velora bike?",
        "What is Velora's return policy?",
        "I changed my mind about my bike. Can I send it back?",
    ],
    "service": [
        "How often should my Velora bike be serviced?",
        "When is the first service due?",
        "Do I need to service my e-bike every year?",
    ],
    "battery care": [
        "How should I store the battery over the winter?",
        "What is the best way to store a Velora battery?",
        "I will not ride for months. What do I do with the battery?",
    ],
    "app pairing": [
        "How do I connect my bike to the VeloraLink app?",
        "How do I pair the app with my bike?",
        "The app does not find my bike. How do I pair it?",
    ],
    "shipping": [
        "How long does delivery take?",
        "When will my new bike be shipped?",
        "Does the bike arrive assembled?",
    ],
}

SPEC_QUESTIONS = {
    "range_km": [
        "How far can the {bike} go on one charge?",
        "What is the range of the {bike}?",
        "How many kilometres does the {bike} do per charge?",
    ],
    "charge_h": [
        "How long does the {bike} take to charge?",
        "What is the charging time of the {bike} battery?",
        "How many hours to charge the {bike} fully?",
    ],
    "weight_kg": ["How heavy is the {bike}?", "What does the {bike} weigh?", "What is the weight of the {bike}?"],
    "price": ["How much does the {bike} cost?", "What is the price of the {bike}?", "What does a new {bike} cost?"],
}

ERROR_QUESTIONS = [
    "My {bike} shows {code} on the display. What does it mean?",
    "The display of my {bike} says {code}. What should I do?",
    "I get error {code} on my {bike}. How do I fix it?",
    "What does error code {code} mean on a {bike}?",
]

ORDER_STATUSES = [
    dict(status="in production", eta_days=9, carrier=None),
    dict(status="packed", eta_days=5, carrier="DHL"),
    dict(status="shipped", eta_days=3, carrier="DHL"),
    dict(status="shipped", eta_days=2, carrier="UPS"),
    dict(status="out for delivery", eta_days=0, carrier="UPS"),
]
ORDER_QUESTIONS = [
    "Where is my order {order}?",
    "What is the status of order {order}?",
    "Has my order {order} shipped yet?",
    "When will order {order} arrive?",
]
WARRANTY_QUESTIONS = [
    "Is my bike with serial {serial} still under warranty?",
    "Can you check the warranty of frame number {serial}?",
    "Does the warranty still cover my bike, serial {serial}?",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up a Velora order by its number.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "check_warranty",
            "description": "Check the warranty of a bike by its frame serial number.",
            "parameters": {
                "type": "object",
                "properties": {"serial": {"type": "string"}},
                "required": ["serial"],
            },
        },
    },
]


def spec_answer(bike: str, key: str) -> str:
    b = BIKES[bike]
    return {
        "range_km": f"The {bike} goes up to {b['range_km']} km on one charge of its {b['battery_wh']} Wh battery. Cold weather, hills and high assist levels lower the range.",
        "charge_h": f"The {bike} battery ({b['battery_wh']} Wh) charges fully in about {b['charge_h']} hours with the standard 4 A charger.",
        "weight_kg": f"The {bike} weighs {b['weight_kg']} kg including the {b['battery_wh']} Wh battery.",
        "price": f"The {bike} costs {b['price']} euros, including the charger and two years of battery warranty.",
    }[key]


def spec_thinking(bike: str, key: str) -> str:
    b = BIKES[bike]
    what = {"range_km": "range", "charge_h": "charging time", "weight_kg": "weight", "price": "price"}[key]
    value = {
        "range_km": f"{b['range_km']} km",
        "charge_h": f"{b['charge_h']} hours",
        "weight_kg": f"{b['weight_kg']} kg",
        "price": f"{b['price']} euros",
    }[key]
    return (
        f"The user asks about the {what} of the {bike}. From the specs: {value}. Give the number and one useful detail."
    )


def make_spec(rng: random.Random, style: str) -> dict:
    bike = rng.choice(list(BIKES))
    key = rng.choice(list(SPEC_QUESTIONS))
    q = rng.choice(SPEC_QUESTIONS[key]).format(bike=bike)
    a = spec_answer(bike, key)
    if style == "pc":
        return {"prompt": q, "completion": a}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {"role": "assistant", rng.choice(["thinking", "reasoning"]): spec_thinking(bike, key), "content": a},
        ]
    }


def make_error(rng: random.Random, style: str) -> dict:
    bike = rng.choice(list(BIKES))
    code = rng.choice(list(ERRORS))
    meaning, fix = ERRORS[code]
    q = rng.choice(ERROR_QUESTIONS).format(bike=bike, code=code)
    a = f"Error {code} means that {meaning}. To fix it, {fix}. If {code} keeps coming back, contact Velora support."
    if style == "pc_messages":
        return {
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": a}],
        }
    thinking = f"Error {code} on a Velora bike: {meaning}. The fix: {fix}. Explain it in two sentences."
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {"role": "assistant", "thinking": thinking, "content": a},
        ],
        "reasoning_effort": rng.choice(["low", "medium"]),
    }


def make_policy(rng: random.Random, style: str) -> dict:
    topic = rng.choice(list(POLICIES))
    q = rng.choice(POLICY_QUESTIONS[topic])
    a = POLICIES[topic]
    if style == "pc":
        return {"prompt": q, "completion": a}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {
                "role": "assistant",
                "thinking": f"This is about Velora's {topic} policy. Quote the documented policy.",
                "content": a,
            },
        ]
    }


def make_order(rng: random.Random) -> dict:
    order = f"VB-{rng.randint(10000, 99999)}"
    s = rng.choice(ORDER_STATUSES)
    q = rng.choice(ORDER_QUESTIONS).format(order=order)
    result = {"order_id": order, "status": s["status"], "eta_days": s["eta_days"]}
    if s["carrier"]:
        result["carrier"] = s["carrier"]
    if s["eta_days"] == 0:
        a = f"Your order {order} is out for delivery with {s['carrier']} and should arrive today."
    elif s["carrier"] is None:
        a = f"Your order {order} is {s['status']}. It should arrive in about {s['eta_days']} days; you will get a tracking link when it ships."
    else:
        a = f"Your order {order} is {s['status']} with {s['carrier']} and should arrive in about {s['eta_days']} days."
    call_id = f"call_{rng.randint(1000, 9999)}"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {
                "role": "assistant",
                "thinking": f"The user asks about order {order}. Look it up with lookup_order.",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": order})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
            {"role": "assistant", "thinking": f"The order is {s['status']}. Tell the user.", "content": a},
        ],
        "tools": TOOLS,
    }


def make_warranty(rng: random.Random) -> dict:
    serial = f"VL{rng.choice([21, 22, 23, 24])}-{rng.randint(1000, 9999)}"
    bike = rng.choice(list(BIKES))
    year = 2000 + int(serial[2:4])
    covered = {"frame": year + 5 >= 2026, "motor": year + 3 >= 2026, "battery": year + 2 >= 2026}
    q = rng.choice(WARRANTY_QUESTIONS).format(serial=serial)
    result = {
        "serial": serial,
        "model": bike,
        "purchased": f"{year}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
        "covered": covered,
    }
    yes = [part for part, ok in covered.items() if ok]
    no = [part for part, ok in covered.items() if not ok]
    a = f"Your {bike} ({serial}) was bought in {year}. "
    a += f"The warranty still covers the {' and the '.join(yes)}" if yes else "The warranty has ended for all parts"
    a += f"; it has ended for the {' and the '.join(no)}." if no and yes else "."
    # Half of them give the call id only, half the function name only: both are accepted.
    match = {"tool_call_id": "w1"} if rng.random() < 0.5 else {"name": "check_warranty"}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "w1",
                        "type": "function",
                        "function": {"name": "check_warranty", "arguments": {"serial": serial}},
                    }
                ],
            },
            {"role": "tool", **match, "content": json.dumps(result)},
            {
                "role": "assistant",
                "thinking": "Compare the parts with the warranty periods: frame 5, motor 3, battery 2 years.",
                "content": a,
            },
        ],
        "tools": TOOLS,
    }


def make_two_turn(rng: random.Random) -> dict:
    bike = rng.choice(list(BIKES))
    k1, k2 = rng.sample(list(SPEC_QUESTIONS), 2)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(SPEC_QUESTIONS[k1]).format(bike=bike)},
            {"role": "assistant", "thinking": spec_thinking(bike, k1), "content": spec_answer(bike, k1)},
            {
                "role": "user",
                "content": rng.choice(["And {what}?", "What about {what}?"]).format(
                    what={
                        "range_km": "the range",
                        "charge_h": "charging",
                        "weight_kg": "the weight",
                        "price": "the price",
                    }[k2]
                ),
            },
            {"role": "assistant", "thinking": spec_thinking(bike, k2), "content": spec_answer(bike, k2)},
        ]
    }


KINDS = [  # (weight, maker)
    (4, lambda r: make_spec(r, "pc")),
    (4, lambda r: make_spec(r, "chat")),
    (2, lambda r: make_policy(r, "pc")),
    (2, lambda r: make_policy(r, "chat")),
    (2, lambda r: make_error(r, "pc_messages")),
    (3, lambda r: make_error(r, "chat")),
    (3, make_order),
    (2, make_warranty),
    (2, make_two_turn),
]


def render_key(ex: dict) -> str:
    """What the example renders to, as far as identity goes: "reasoning" and "thinking" render the same."""

    def norm(x):
        if isinstance(x, dict):
            return {("thinking" if k == "reasoning" else k): norm(v) for k, v in x.items()}
        if isinstance(x, list):
            return [norm(v) for v in x]
        return x

    return json.dumps(norm(ex), sort_keys=True)


def generate() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    makers = [m for w, m in KINDS for _ in range(w)]
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < N_TRAIN + N_VALIDATION:
        ex = rng.choice(makers)(rng)
        key = render_key(ex)
        if key not in seen:  # no example twice, so validation never repeats a training example
            seen.add(key)
            out.append(ex)
    return out[:N_TRAIN], out[N_TRAIN:]


def lines(examples: list[dict]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = ap.parse_args()
    train, validation = generate()
    files = {OUT / "train.jsonl": lines(train), OUT / "validation.jsonl": lines(validation)}
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        print("up to date" if not stale else "differs: " + ", ".join(stale))
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for p, text in files.items():
        tmp = p.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(p)
        print(f"wrote {p} ({text.count(chr(10))} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
