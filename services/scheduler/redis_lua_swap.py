"""The step script's swap operations (`swapout`, `swapin`; see scheduler/swap_blocks.py).

A Lua fragment that redis_lua.py splices into the step script after its other operations: it
uses the prelude's helpers (`bulk`, `take`, `available`, `free_gpu_table`, `free_cpu_table`) and
keys (`CFREE`, `CREF`, `REF`, `REQS`). Each distinct device block of the group maps to one CPU
block taken from the CPU free list's head (and back to one device block, free list first, then
LRU eviction), in table order, exactly as `BlockManager.swap_out` / `swap_in` do; the answers
are the (src, dst) pairs the executor copies.
"""

from __future__ import annotations

SWAP_OPS_LUA = r"""
local function op_swapout(rids, lengths)
  local kept, seen, distinct = {}, {}, 0
  for i = 1, #rids do
    if redis.call('EXISTS', P .. 'ctable:' .. rids[i]) == 1 then return {0, {}} end
    local n = tonumber(lengths[i])
    local blocks = {}
    if n > 0 then blocks = redis.call('LRANGE', P .. 'table:' .. rids[i], 0, n - 1) end
    kept[i] = blocks
    for _, g in ipairs(blocks) do
      if not seen[g] then seen[g] = true; distinct = distinct + 1 end
    end
  end
  if distinct > redis.call('LLEN', CFREE) then return {0, {}} end
  local got = {}
  if distinct > 0 then got = redis.call('LPOP', CFREE, distinct) end
  local mapping, moved, cnt, order = {}, {}, {}, {}
  for i = 1, #rids do
    local ctable = {}
    for _, g in ipairs(kept[i]) do
      local c = mapping[g]
      if not c then
        c = got[#order + 1]
        mapping[g] = c
        order[#order + 1] = c
        moved[#moved + 1] = {tonumber(g), tonumber(c)}
        cnt[c] = 0
      end
      cnt[c] = cnt[c] + 1
      ctable[#ctable + 1] = c
    end
    if #ctable > 0 then
      bulk('RPUSH', P .. 'ctable:' .. rids[i], ctable, 1)
      redis.call('SADD', REQS, rids[i])
    end
  end
  local flat = {}
  for _, c in ipairs(order) do flat[#flat + 1] = c; flat[#flat + 1] = cnt[c] end
  if #flat > 0 then bulk('HSET', CREF, flat, 2) end
  for i = 1, #rids do free_gpu_table(rids[i]) end
  return {1, moved}
end

local function op_swapin(rids)
  local ctables, seen, distinct = {}, {}, 0
  for i = 1, #rids do
    if redis.call('LLEN', P .. 'table:' .. rids[i]) > 0 then return {0, {}} end
    local t = redis.call('LRANGE', P .. 'ctable:' .. rids[i], 0, -1)
    ctables[i] = t
    for _, c in ipairs(t) do
      if not seen[c] then seen[c] = true; distinct = distinct + 1 end
    end
  end
  if distinct > available() then return {0, {}} end
  local got = take(distinct)
  local mapping, moved, cnt, order = {}, {}, {}, {}
  for i = 1, #rids do
    local gtable = {}
    for _, c in ipairs(ctables[i]) do
      local g = mapping[c]
      if not g then
        g = got[#order + 1]
        mapping[c] = g
        order[#order + 1] = g
        moved[#moved + 1] = {tonumber(c), tonumber(g)}
        cnt[g] = 0
      end
      cnt[g] = cnt[g] + 1
      gtable[#gtable + 1] = g
    end
    if #gtable > 0 then
      bulk('RPUSH', P .. 'table:' .. rids[i], gtable, 1)
      redis.call('SADD', REQS, rids[i])
    end
  end
  local flat = {}
  for _, g in ipairs(order) do flat[#flat + 1] = g; flat[#flat + 1] = cnt[g] end
  if #flat > 0 then bulk('HSET', REF, flat, 2) end
  for i = 1, #rids do free_cpu_table(rids[i]) end
  return {1, moved}
end

"""
