#!/bin/bash
# MoEfication of the SwiGLU dense demo twin (3 seeds): val loss per router and active fraction, and with recovery.
cd /work/wt-speed
R=/work/lbruns/swiglu/results.jsonl; : > $R
for s in 0 1 2; do
  D=/work/wt-upcycle/runs/upcycle_shakespeare/dense-cont-$s
  v=$(.venv/bin/moesaic eval $D 2>/dev/null | grep -o "val_loss [0-9.]*" | cut -d' ' -f2)
  echo "{\"seed\": $s, \"router\": \"dense\", \"active\": 1.0, \"recover\": 0, \"val_loss\": $v}" >> $R
  for r in centroid avgk mlp; do for f in 0.1 0.25 0.5; do
    O=/work/lbruns/swiglu/o-$s-$r-$f; rm -rf $O
    .venv/bin/moesaic convert moefy $D $O --set num_experts=32 --set router=$r --set active_fraction=$f --set data=/work/lbruns/swiglu/calib.txt > /dev/null 2>&1
    v=$(.venv/bin/moesaic eval $O 2>/dev/null | grep -o "val_loss [0-9.]*" | cut -d' ' -f2)
    echo "{\"seed\": $s, \"router\": \"$r\", \"active\": $f, \"recover\": 0, \"val_loss\": $v}" >> $R; rm -rf $O
  done; done
  for r in mlp centroid; do
    O=/work/lbruns/swiglu/o-$s-$r-rec; rm -rf $O
    .venv/bin/moesaic convert moefy $D $O --set num_experts=32 --set router=$r --set active_fraction=0.5 --set data=/work/lbruns/swiglu/calib.txt --set recover_steps=300 --set recover_lr=3e-4 --set recover_batch=1 > /dev/null 2>&1
    v=$(.venv/bin/moesaic eval $O 2>/dev/null | grep -o "val_loss [0-9.]*" | cut -d' ' -f2)
    echo "{\"seed\": $s, \"router\": \"$r\", \"active\": 0.5, \"recover\": 300, \"val_loss\": $v}" >> $R; rm -rf $O
  done
done
echo done >> /work/lbruns/swiglu/done
