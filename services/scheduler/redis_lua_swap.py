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
-- How many distinct blocks `tables` hold between them.
local function count_distinct(tables)
  local seen, distinct = {}, 0
  for i = 1, #tables do
    for _, b in ipairs(tables[i]) do
      if not seen[b] then seen[b] = true; distinct = distinct + 1 end
    end
  end
  return distinct
end

-- Give each of `rids` a new table under `prefix`: one block of `got` (in order) for each
-- distinct block of `tables`, in table order, with the new blocks' ref counts in `refkey`.
-- Returns the (old, new) block pairs.
local function remap(rids, tables, got, prefix, refkey)
  local mapping, moved, cnt, order = {}, {}, {}, {}
  for i = 1, #rids do
    local new = {}
    for _, b in ipairs(tables[i]) do
      local m = mapping[b]
      if not m then
        m = got[#order + 1]
        mapping[b] = m
        order[#order + 1] = m
        moved[#moved + 1] = {tonumber(b), tonumber(m)}
        cnt[m] = 0
      end
      cnt[m] = cnt[m] + 1
      new[#new + 1] = m
    end
    if #new > 0 then
      bulk('RPUSH', P .. prefix .. rids[i], new, 1)
      redis.call('SADD', REQS, rids[i])
    end
  end
  local flat = {}
  for _, m in ipairs(order) do flat[#flat + 1] = m; flat[#flat + 1] = cnt[m] end
  if #flat > 0 then bulk('HSET', refkey, flat, 2) end
  return moved
end

local function op_swapout(rids, lengths)
  local kept = {}
  for i = 1, #rids do
    if redis.call('EXISTS', P .. 'ctable:' .. rids[i]) == 1 then return {0, {}} end
    local n = tonumber(lengths[i])
    local blocks = {}
    if n > 0 then blocks = redis.call('LRANGE', P .. 'table:' .. rids[i], 0, n - 1) end
    kept[i] = blocks
  end
  local distinct = count_distinct(kept)
  if distinct > redis.call('LLEN', CFREE) then return {0, {}} end
  local got = {}
  if distinct > 0 then got = redis.call('LPOP', CFREE, distinct) end
  local moved = remap(rids, kept, got, 'ctable:', CREF)
  for i = 1, #rids do free_gpu_table(rids[i]) end
  return {1, moved}
end

local function op_swapin(rids)
  local ctables = {}
  for i = 1, #rids do
    if redis.call('LLEN', P .. 'table:' .. rids[i]) > 0 then return {0, {}} end
    ctables[i] = redis.call('LRANGE', P .. 'ctable:' .. rids[i], 0, -1)
  end
  local distinct = count_distinct(ctables)
  if distinct > available() then return {0, {}} end
  local moved = remap(rids, ctables, take(distinct), 'table:', REF)
  for i = 1, #rids do free_cpu_table(rids[i]) end
  return {1, moved}
end
"""
