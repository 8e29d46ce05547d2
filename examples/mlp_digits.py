"""Train a two-layer MLP on the bundled 8x8 digits in one process; print accuracy and time.

Run: python examples/mlp_digits.py
"""

import time

import numpy as np

import distad as ad

nn, F = ad.nn, ad.nn.functional
SEED, EPOCHS, BATCH = 0, 30, 32


def accuracy(model, X, y):
    with ad.no_grad():
        return float((model(ad.tensor(X)).data.argmax(axis=1) == y).mean())


def main():
    start = time.perf_counter()
    X, y = ad.data.load_digits()                          # (1797, 64) float32 in [0, 1], int64
    X_tr, X_te, y_tr, y_te = ad.data.train_test_split(X, y, test_size=0.2, seed=SEED)
    loader = ad.data.DataLoader(ad.data.ArrayDataset(X_tr, y_tr), batch_size=BATCH,
                                shuffle=True, seed=SEED)
    rng = np.random.default_rng(SEED)                     # every weight comes from here
    model = nn.Sequential(nn.Linear(64, 256, rng=rng), nn.ReLU(), nn.Linear(256, 10, rng=rng))
    opt = ad.optim.Adam(model.parameters(), lr=3e-3)
    sched = ad.optim.CosineAnnealingLR(opt, T_max=EPOCHS)

    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(ad.tensor(xb)), yb, label_smoothing=0.1)
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 9:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  "
                  f"test accuracy {accuracy(model, X_te, y_te):.4f}")

    seconds = time.perf_counter() - start
    print(f"MLP test accuracy {accuracy(model, X_te, y_te):.4f} "
          f"({len(y_te)} held-out digits) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
